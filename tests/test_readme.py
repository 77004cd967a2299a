"""The README cannot drift from the code it documents."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
README = HERE.parent / "README.md"


def test_the_readme_ack_table_is_the_newest_celerys_pinned_one() -> None:
    # Each pinned table is checked against the engine on its own release (test_ack_table).
    newest = max(
        (HERE / "ack_tables").glob("celery-*.md"),
        key=lambda path: [int(part) for part in path.stem.split("-")[1].split(".")],
    )
    assert newest.name.startswith("celery-5.7-")
    assert newest.read_text(encoding="utf-8") in README.read_text(encoding="utf-8"), (
        f"the README's ack table differs from tests/ack_tables/{newest.name}; paste that "
        "file into README.md"
    )


def test_the_readme_names_the_two_commands_on_lines_of_their_own() -> None:
    lines = [line.strip() for line in README.read_text(encoding="utf-8").splitlines()]
    assert "pip install -e '.[test]'" in lines
    assert "pytest" in lines
