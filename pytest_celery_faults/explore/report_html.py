"""``--celery-faults-html``: one self-contained page people look at.

Per test: each task's judged scenarios as a matrix (fault kind by boundary,
each cell coloured by its class; a click shows its replay spec and what went
wrong), ``explore()``'s counts per task with the smallest failing schedule and
its timeline, and the gate's per-spec counts. Made from the JSON report's
document, so the page and the JSON agree cell for cell; no script, style or
font is fetched from anywhere (one file to attach to a CI run).
"""

from __future__ import annotations

import re
from html import escape
from typing import Any, Final

#: A cell's colour per class (the JSON report's names).
COLOURS: Final[dict[str, str]] = {
    "ok": "#2e7d32",
    "duplicated": "#c62828",
    "diverged": "#ef6c00",
    "lost": "#6a1b9a",
    "partial": "#ad1457",
    "ended_otherwise": "#1565c0",
    "unfired": "#9e9e9e",
}
FATES: Final[tuple[str, ...]] = ("once", "recovered", "duplicated", "lost", "failed")
_BOUNDARY = re.compile(r"@([0-9]+)")

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.6em; }
h3 { font-size: 1em; margin: 1em 0 .3em; }
table { border-collapse: collapse; margin: .3em 0 .8em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
td.cell { padding: 0; }
td.cell button { width: 100%; min-width: 4.5em; border: 0; color: #fff; cursor: pointer;
  padding: 3px 6px; font: inherit; }
.legend span { display: inline-block; color: #fff; padding: 1px 6px; margin-right: 4px; }
pre { background: #f5f5f5; padding: .6em; overflow-x: auto; white-space: pre-wrap; }
.failed { color: #c62828; font-weight: bold; } .passed { color: #2e7d32; }
"""

SCRIPT = """
document.addEventListener("click", function (event) {
  var cell = event.target.closest("button[data-detail]");
  if (!cell) { return; }
  var panel = document.getElementById(cell.getAttribute("data-panel"));
  panel.textContent = cell.getAttribute("data-detail");
  panel.hidden = false;
});
"""


def render(
    document: dict[str, Any],
    explored: dict[str, list[dict[str, Any]]],
    gate: dict[str, tuple[int, int]],
) -> str:
    """The page for the JSON report's ``document``, explore summaries by node id, gate counts."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        "<title>celery-faults report</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>celery-faults report (seed {escape(str(document.get('seed')))})</h1>",
        _totals(document.get("totals", {})),
        _legend(),
    ]
    if gate:
        parts.append(_gate(gate))
    for number, (nodeid, test) in enumerate(document.get("tests", {}).items()):
        parts.append(_test(number, nodeid, test, explored.get(nodeid, [])))
    for nodeid in explored:
        if nodeid not in document.get("tests", {}):
            parts.append(_test(len(parts), nodeid, {}, explored[nodeid]))
    parts.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(parts) + "\n"


def _totals(totals: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th>{escape(name.replace('_', ' '))}</th><td>{escape(str(value))}</td></tr>"
        for name, value in totals.items()
    )
    return f'<table class="totals">{rows}</table>'


def _legend() -> str:
    spans = "".join(
        f'<span style="background:{colour}">{escape(name)}</span>'
        for name, colour in COLOURS.items()
    )
    return f'<p class="legend">{spans}</p>'


def _gate(gate: dict[str, tuple[int, int]]) -> str:
    rows = "".join(
        f"<tr><td><code>--celery-faults={escape(repr(spec))}</code></td>"
        f"<td>{fired}</td><td>{under}</td></tr>"
        for spec, (fired, under) in gate.items()
    )
    return (
        '<h2>The gate</h2><table class="gate"><tr><th>spec</th><th>tests it fired in</th>'
        f"<th>tests that ran under it</th></tr>{rows}</table>"
    )


def _test(number: int, nodeid: str, test: dict[str, Any], explores: list[dict[str, Any]]) -> str:
    verdict = str(test.get("verdict", "passed"))
    parts = [
        f'<section class="test" data-test="{escape(nodeid)}"><h2>{escape(nodeid)} '
        f'<span class="{escape(verdict)}">{escape(verdict)}</span></h2>'
    ]
    facts = [
        f"{test[name]} {name}" for name in ("messages", "faults") if test.get(name) is not None
    ]
    if facts:
        parts.append(f"<p>{escape(', '.join(facts))}</p>")
    by_task: dict[str, list[dict[str, str]]] = {}
    for scenario in test.get("scenarios", []):
        by_task.setdefault(scenario.get("task", "?"), []).append(scenario)
    for index, (task, scenarios) in enumerate(by_task.items()):
        parts.append(_matrix(f"panel-{number}-{index}", task, scenarios))
    for index, summary in enumerate(explores):
        parts.append(_explore(summary, index))
    parts.append("</section>")
    return "\n".join(parts)


def _matrix(panel: str, task: str, scenarios: list[dict[str, str]]) -> str:
    """Kind by boundary: a row per spec with its first boundary taken out, a column per N."""
    rows: dict[str, dict[str, dict[str, str]]] = {}
    columns: set[str] = set()
    for judged in scenarios:
        spec = judged.get("spec", "")
        found = _BOUNDARY.search(spec)
        column = found.group(1) if found else "-"
        row = _BOUNDARY.sub("@N", spec, count=1) if found else spec
        rows.setdefault(row, {})[column] = judged
        columns.add(column)
    ordered = sorted(columns, key=lambda c: (c == "-", int(c) if c.isdigit() else 0))
    head = "".join(f"<th>@{escape(c)}</th>" if c != "-" else "<th>-</th>" for c in ordered)
    body = []
    for row, cells in rows.items():
        tds = []
        for column in ordered:
            scenario = cells.get(column)
            if scenario is None:
                tds.append("<td></td>")
                continue
            verdict = scenario.get("class", "")
            detail = f"{scenario.get('spec', '')}: {verdict}"
            if scenario.get("problem"):
                detail += f"\n{scenario['problem']}"
            detail += f"\nreplay: celery_faults.run(signature, {scenario.get('spec', '')!r})"
            colour = COLOURS.get(verdict, "#455a64")
            tds.append(
                f'<td class="cell"><button type="button" style="background:{colour}" '
                f'data-class="{escape(verdict)}" data-spec="{escape(scenario.get("spec", ""))}" '
                f'data-panel="{panel}" data-detail="{escape(detail)}">{escape(verdict)}</button>'
                "</td>"
            )
        body.append(f"<tr><th>{escape(row)}</th>{''.join(tds)}</tr>")
    return (
        f"<h3>{escape(task)}: {len(scenarios)} scenario(s)</h3>"
        f'<table class="matrix"><tr><th>fault</th>{head}</tr>{"".join(body)}</table>'
        f'<pre id="{panel}" hidden></pre>'
    )


def _explore(summary: dict[str, Any], index: int) -> str:
    counts = summary.get("counts", {})
    head = "".join(f"<th>{fate}</th>" for fate in FATES)
    rows = "".join(
        f"<tr><th>{escape(task)}</th><td>{entry.get('published', 0)}</td>"
        + "".join(f"<td>{entry.get(fate, 0)}</td>" for fate in FATES)
        + "</tr>"
        for task, entry in counts.items()
    )
    found = summary.get("replay")
    verdict = (
        f'<p class="failed">failed: {escape(str(summary.get("problem")))}<br>replay: '
        f"<code>{escape(found)}</code></p><pre>{escape(str(summary.get('timeline') or ''))}</pre>"
        if found
        else '<p class="passed">no failing schedule</p>'
    )
    return (
        f"<h3>explore #{index + 1}: {summary.get('runs', 0)} runs (seed {summary.get('seed')}, "
        f"budget {summary.get('budget')})</h3>"
        f'<table class="explore"><tr><th>task</th><th>published</th>{head}</tr>{rows}</table>'
        f"{verdict}"
    )
