"""The oldest pytest the plugin claims is the one the matrix runs (noxfile's oldest_pytest)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def floors() -> dict[str, str]:
    """``name>=X.Y`` from pyproject's dependencies and its test extra: name -> X.Y."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    found: dict[str, str] = {}
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        matched = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement.replace(" ", ""))
        if matched:
            found[matched[1].lower()] = matched[2]
    return found


def test_the_pytest_floors_are_the_ones_the_oldest_pytest_cell_runs() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import noxfile
    finally:
        sys.path.remove(str(ROOT))
    declared = floors()
    assert {
        name: declared[name] for name in ("pytest", "pluggy", "pytest-timeout", "pytest-xdist")
    } == noxfile.OLDEST_PYTEST
    assert declared["pytest"] == "7.4"  # teams pin 7.4: installing the plugin must not upgrade it
    assert "oldest_pytest" in noxfile.CI_UNIT_CELLS
