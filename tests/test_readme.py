"""The README cannot drift from the code it documents."""

from __future__ import annotations

from pathlib import Path

from pytest_celery_faults.ack_table import table

README = Path(__file__).resolve().parent.parent / "README.md"


def test_the_readme_ack_table_is_the_generated_one() -> None:
    assert table() in README.read_text(encoding="utf-8"), (
        "the README's ack table differs from `python -m pytest_celery_faults.ack_table`; "
        "paste the new output into README.md"
    )


def test_the_readme_names_the_two_commands_on_lines_of_their_own() -> None:
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    assert "pip install -e '.[test]'" in lines
    assert "pytest" in lines
