"""--celery-faults-html: one self-contained page that agrees with the JSON report."""

from __future__ import annotations

import importlib.util
import json
import shutil
from html.parser import HTMLParser
from typing import Any

import pytest
from html_project import APP, EXPLORE, SUITE

from pytest_celery_faults.explore.report_html import COLOURS, render


class Page(HTMLParser):
    """What a reader of the page meets: cells, tables, anything fetched from elsewhere."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: list[dict[str, str | None]] = []
        self.tables: list[str] = []
        self.fetched: list[str] = []
        self.panels: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "button" and "data-class" in found:
            self.cells.append(found)
        if tag == "table":
            self.tables.append(found.get("class") or "")
        if tag == "pre" and found.get("id"):
            self.panels.add(str(found["id"]))
        for name in ("src", "href"):
            if found.get(name):
                self.fetched.append(str(found[name]))
        if tag == "link":
            self.fetched.append(str(found))


def parsed(text: str) -> Page:
    page = Page()
    page.feed(text)
    page.close()
    return page


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makepyfile(proj=APP, test_suite=SUITE)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    return pytester


def test_the_page_has_a_cell_for_every_scenario_the_json_report_has(
    project: pytest.Pytester,
) -> None:
    html = project.path / "report.html"
    report = project.path / "report.json"
    result = project.runpytest(
        "-p",
        "no:randomly",
        "--celery-faults=redeliver",
        f"--celery-faults-html={html}",
        f"--celery-faults-report={report}",
    )
    result.assert_outcomes(passed=2)
    document = json.loads(report.read_text())
    scenarios = document["tests"]["test_suite.py::test_sweep"]["scenarios"]
    assert len(scenarios) > 4
    page = parsed(html.read_text())
    assert sorted((c["data-spec"], c["data-class"]) for c in page.cells) == sorted(
        (s["spec"], s["class"]) for s in scenarios
    )
    assert {c["data-panel"] for c in page.cells} <= page.panels  # a click has a place to go
    assert all(c["data-class"] in COLOURS for c in page.cells)
    assert "gate" in page.tables and "matrix" in page.tables
    assert not page.fetched  # self-contained: nothing to fetch
    text = html.read_text()
    assert "--celery-faults=&#x27;redeliver&#x27;" in text
    # The same seed gives the same page.
    again = project.path / "again.html"
    project.runpytest(
        "-p", "no:randomly", "--celery-faults=redeliver", f"--celery-faults-html={again}"
    )
    assert again.read_bytes() == html.read_bytes()


@pytest.mark.skipif(importlib.util.find_spec("hypothesis") is None, reason="explore's search")
def test_the_page_shows_explore_counts_and_the_smallest_failing_schedule(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(proj=APP, test_explored=EXPLORE)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    html = pytester.path / "report.html"
    result = pytester.runpytest("-p", "no:randomly", f"--celery-faults-html={html}")
    result.assert_outcomes(passed=1)
    text = html.read_text()
    page = parsed(text)
    assert "explore" in page.tables
    assert "replay: <code>proj.append_row:redeliver</code>" in text
    assert "<th>proj.append_row</th>" in text
    # Under xdist the workers' explore() summaries reach the one page (the same one, once
    # the failure database is gone: else its saved schedule is replayed instead of a search).
    shutil.rmtree(pytester.path / ".celery-faults")
    spread = pytester.path / "spread.html"
    result = pytester.runpytest("-p", "no:randomly", "-n", "2", f"--celery-faults-html={spread}")
    result.assert_outcomes(passed=1)
    assert spread.read_text() == text


def test_render_escapes_what_it_shows() -> None:
    document: dict[str, Any] = {
        "seed": 1,
        "totals": {"tests": 1},
        "tests": {
            "t.py::test_<x>": {
                "verdict": "failed",
                "scenarios": [
                    {"task": "t<b>", "spec": "sigkill@1", "class": "duplicated", "problem": "<i>"}
                ],
            }
        },
    }
    text = render(document, {}, {})
    assert "<b>" not in text and "<i>" not in text and "test_&lt;x&gt;" in text
    assert parsed(text).cells[0]["data-detail"] == (
        "sigkill@1: duplicated\n<i>\nreplay: celery_faults.run(signature, 'sigkill@1')"
    )
