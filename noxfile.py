"""The support matrix: every supported Celery minor release, and every supported Python.

    nox                                        # the lean matrix CI runs, then its table
    nox -s "tests-3.12(celery='5.4')"          # one cell, any Celery on any Python
    nox -s real                                # real-broker conformance on the oldest Celery

Each ``tests`` session installs the project with ``celery==X.Y.*`` and the
billiard that release is tested with into its own virtualenv and runs the suite
but ``tests/real`` on two xdist workers; ``real`` runs ``tests/real`` (RabbitMQ and
Redis on loopback: ``bash .ci/brokers``). Every session leaves a JUnit report in
``.nox/results``; ``matrix`` (last) prints one line per cell with its counts,
and fails unless every cell that ran passed.

The default selection is lean, because the README's ``pytest`` already runs the
whole suite, ``tests/real`` included, on the newest Celery and Python 3.11: every
other Celery minor release on 3.11, the newest Celery on 3.12, the oldest on 3.13,
and ``tests/real`` on the oldest Celery. Every other cell runs by name.
Virtualenvs are reused between local runs; a Python the machine lacks is skipped
and the table says so.
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import nox

nox.options.reuse_venv = "yes"
#: uv (``nox[uv]`` in the test extra) builds a cell's virtualenv in seconds where pip takes
#: about a minute; without it, virtualenv and pip as before.
nox.options.default_venv_backend = "uv|virtualenv"
nox.options.download_python = "never"
nox.options.error_on_missing_interpreters = False

PYTHONS = ["3.11", "3.12", "3.13"]
#: Celery minor release -> the billiard minor release it is tested with: the pool it was
#: released with (Celery 5.3 to 5.6 allow billiard 4.3, whose reporting of a child's
#: sys.exit only Celery 5.7 handles; 5.7 requires billiard 4.3).
CELERY = {"5.3": "4.2", "5.4": "4.2", "5.5": "4.2", "5.6": "4.2", "5.7": "4.3"}
OLDEST, NEWEST = min(CELERY), max(CELERY)
#: The cells CI runs (``nox`` with no ``-s``): the README's run covers NEWEST on PYTHONS[0],
#: these every other Celery release on it, and each other Python once: the newest Celery
#: (billiard 4.3) on 3.12, the oldest (billiard 4.2, the pair furthest from the newest
#: Python) on 3.13. What differs between Pythons is the plugin's own code and the pool's,
#: and each billiard meets a newer Python in one cell.
LEAN = [(celery, PYTHONS[0]) for celery in CELERY if celery != NEWEST] + [
    (NEWEST, PYTHONS[1]),
    (OLDEST, PYTHONS[2]),
]
#: The real-broker conformance suite on the oldest Celery (the README's run has the newest).
REAL = [OLDEST, NEWEST]
#: The oldest pytest the plugin supports (pyproject's floor), with the oldest pluggy (1.2:
#: ``hookimpl(wrapper=True)``), pytest-timeout and pytest-xdist pyproject allows beside it:
#: teams pin pytest, and installing the plugin must not upgrade it. One cell, on the newest
#: Celery and the oldest Python: what differs between Celery releases is the other cells'
#: business, what differs between pytests is this one's.
OLDEST_PYTEST = {"pytest": "7.4", "pluggy": "1.2", "pytest-timeout": "2.2", "pytest-xdist": "3.5"}
#: What ``.ci/run`` runs: the unit cells, and the real-broker cell beside them.
CI_UNIT_CELLS = [f"tests-{python}(celery='{celery}')" for celery, python in LEAN] + [
    "oldest_pytest"
]
CI_REAL_CELL = f"real(celery='{OLDEST}')"
nox.options.sessions = [*CI_UNIT_CELLS, CI_REAL_CELL, "matrix"]
RESULTS = Path(__file__).resolve().parent / ".nox" / "results"

VERSIONS = (
    "import json, platform; from importlib.metadata import version; "
    "print(json.dumps({name: version(name) for name in ('celery', 'billiard', 'kombu', "
    "'pytest', 'pluggy')} | {'python': platform.python_version()}))"
)


def run_suite(
    session: nox.Session, celery: str, name: str, *pytest_args: str, pins: tuple[str, ...] = ()
) -> None:
    # uv installs without byte-compiling (pip compiles): where PYTHONDONTWRITEBYTECODE is
    # set, every pytest process, xdist worker and pytester subprocess would compile Celery,
    # kombu, Django and Hypothesis again at import, and a cell took 6 minutes instead of 2.
    session.env["UV_COMPILE_BYTECODE"] = "1"
    session.install("-e", ".[test]", f"celery=={celery}.*", f"billiard=={CELERY[celery]}.*", *pins)
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = RESULTS / f"{name}.xml"
    report.unlink(missing_ok=True)
    versions = session.run("python", "-c", VERSIONS, silent=True)
    if not isinstance(versions, str):  # nox --install-only runs nothing
        return
    (RESULTS / f"{name}.json").write_text(versions.strip().splitlines()[-1], encoding="utf-8")
    session.run("pytest", *pytest_args, f"--junitxml={report}", *session.posargs)


@nox.session(python=PYTHONS)
@nox.parametrize("celery", list(CELERY))
def tests(session: nox.Session, celery: str) -> None:
    """The suite but the real-broker tests, on one Celery release and one Python."""
    run_suite(
        session, celery, f"tests-{celery}-py{session.python}", "--ignore=tests/real", "-n", "2"
    )


@nox.session(python=PYTHONS[0])
def oldest_pytest(session: nox.Session) -> None:
    """The suite but the real-broker tests on pytest 7.4 (and the pytest-timeout and
    pytest-xdist of its time), the newest Celery, the oldest Python."""
    pins = tuple(f"{name}=={minor}.*" for name, minor in OLDEST_PYTEST.items())
    run_suite(session, NEWEST, "oldest-pytest", "--ignore=tests/real", "-n", "2", pins=pins)


@nox.session(python=PYTHONS[0])
@nox.parametrize("celery", REAL)
def real(session: nox.Session, celery: str) -> None:
    """The real-broker conformance suite (tests/real) on one Celery release."""
    session.env["CELERY_FAULTS_REQUIRE_BROKERS"] = os.environ.get(
        "CELERY_FAULTS_REQUIRE_BROKERS", "0"
    )
    run_suite(session, celery, f"real-{celery}", "tests/real")


def counts(report: Path) -> dict[str, int]:
    """pytest's counts from its JUnit report."""
    suite = ElementTree.parse(report).getroot()
    if suite.tag == "testsuites":
        suite = suite[0]
    total, skipped = int(suite.get("tests", 0)), int(suite.get("skipped", 0))
    failed, errors = int(suite.get("failures", 0)), int(suite.get("errors", 0))
    return {
        "passed": total - skipped - failed - errors,
        "failed": failed,
        "errors": errors,
        "skipped": skipped,
    }


@nox.session(python=False)
def matrix(session: nox.Session) -> None:
    """One line per Celery release and Python with its counts; fails unless all passed."""
    cells = [(f"tests-{c}-py{p}", "suite") for c in CELERY for p in PYTHONS]
    cells += [(f"real-{c}", "tests/real") for c in REAL]
    cells += [("oldest-pytest", "suite, oldest pytest")]
    ran = [cell for cell in cells if (RESULTS / f"{cell[0]}.json").exists()]
    print(f"cells run: {len(ran)} of {len(cells)} (the others run by name)", flush=True)
    problems: list[str] = []
    pythons_run: set[str] = set()
    passed = failed = 0
    for name, suite in ran:
        report, versions_file = RESULTS / f"{name}.xml", RESULTS / f"{name}.json"
        versions = json.loads(versions_file.read_text(encoding="utf-8"))
        pythons_run.add(versions["python"])
        label = (
            f"celery {versions['celery']} (billiard {versions['billiard']}, kombu "
            f"{versions['kombu']}) on python {versions['python']}, pytest "
            f"{versions.get('pytest', '?')}, {suite}"
        )
        found = counts(report) if report.exists() else {"passed": 0, "failed": 0, "errors": 1}
        passed += found["passed"]
        failed += found["failed"] + found["errors"]
        line = f"{label}: " + ", ".join(f"{value} {key}" for key, value in found.items())
        print(line, flush=True)
        if found["failed"] or found["errors"] or not found["passed"]:
            problems.append(line)
    absent = [p for p in PYTHONS if not any(run.startswith(f"{p}.") for run in pythons_run)]
    print(
        f"pythons run: {', '.join(sorted(pythons_run)) or 'none'}"
        + (f"; not run: {', '.join(absent)}" if absent else ""),
        flush=True,
    )
    print(f"matrix: {passed} passed, {failed} failed", flush=True)
    if problems or not passed:
        session.error("not every cell of the matrix passed")
