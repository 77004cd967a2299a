"""The pytest side of exploring: ``--celery-faults-explore=N`` and the failure database's ini.

Imported by the plugin in every suite, so it imports pytest alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

DATABASE_INI = "celery_faults_explore_db"
DEFAULT_DIRECTORY = ".celery-faults"


@dataclass
class ExploreDefaults:
    """What the plugin sets for every test: the suite-wide budget, the database, the test id."""

    budget: int | None = None
    database: str | Path | None = None
    key: str | None = None


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
    return ExploreDefaults(
        budget=config.getoption("celery_faults_explore", default=None),
        database=Path(config.rootpath, directory),
        key=request.node.nodeid,
    )
