"""--celery-faults-html in a real headless Chromium: it renders, agrees with the JSON
report cell for cell, a click opens a cell's detail, nothing fails in the console and
nothing is fetched. A skip where Chromium is missing; a failure in CI (``CI``, or
``CELERY_FAULTS_REQUIRE_BROWSER=1`` as ``.ci/run`` sets it)."""

from __future__ import annotations

import base64
import fcntl
import importlib.util
import json
import os
import select
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from html_project import APP, EXPLORE, SUITE

from pytest_celery_faults.explore.report_html import COLOURS

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
#: Seconds the browser gets for everything (start, load, every command, close).
DEADLINE = 60.0

#: What a reader meets once the page's script ran: every matrix cell (its test, spec,
#: class, whether it is drawn, its colour), the tables, the resources the page loaded.
READ_PAGE = """(() => {
  const cells = [...document.querySelectorAll("table.matrix button[data-class]")].map((b) => {
    const box = b.getBoundingClientRect();
    return {
      test: b.closest("section.test").dataset.test, spec: b.dataset.spec,
      cls: b.dataset.class, text: b.textContent, panel: b.dataset.panel,
      drawn: box.width > 0 && box.height > 0, colour: getComputedStyle(b).backgroundColor,
    };
  });
  return {
    title: document.title, cells,
    tables: [...document.querySelectorAll("table")].map((t) => t.className),
    explore: [...document.querySelectorAll("table.explore tr th:first-child")]
      .map((th) => th.textContent),
    resources: performance.getEntriesByType("resource").map((e) => e.name),
  };
})()"""


def browser_required() -> bool:
    return bool(os.environ.get("CI")) or os.environ.get("CELERY_FAULTS_REQUIRE_BROWSER") == "1"


@pytest.fixture
def browser() -> str:
    """Chromium's path; a skip without it, a failure where it is required."""
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    if browser_required():
        pytest.fail(
            "the browser check is mandatory here (CI): no chromium on PATH "
            "(apt-get install chromium)",
            pytrace=False,
        )
    pytest.skip(reason="no headless chromium on PATH (apt-get install chromium); CI runs this")


class DevTools:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe``: JSON messages ended
    by a NUL byte, commands on the browser's fd 3, answers and events on its fd 4."""

    def __init__(self, binary: str, profile: Path) -> None:
        self.deadline = time.monotonic() + DEADLINE
        commands, self._to_browser = os.pipe()
        self._from_browser, answers = os.pipe()

        def on_fds_3_and_4() -> None:
            # In the child, before exec: out of the way first (either may be 3 or 4), then
            # onto 3 and 4, the only inheritable copies (Python's own fds are not).
            low = fcntl.fcntl(commands, fcntl.F_DUPFD_CLOEXEC, 10)
            high = fcntl.fcntl(answers, fcntl.F_DUPFD_CLOEXEC, 10)
            os.dup2(low, 3)
            os.dup2(high, 4)

        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "--window-size=1280,2000",
                "about:blank",
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,  # pass_fds would need 3 and 4 open here too
            preexec_fn=on_fds_3_and_4,
        )
        os.close(commands)
        os.close(answers)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def _receive(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = self.deadline - time.monotonic()
            ready, _, _ = select.select([self._from_browser], [], [], max(left, 0))
            if not ready:
                raise TimeoutError(f"chromium did not answer within {DEADLINE} s")
            chunk = os.read(self._from_browser, 1 << 16)
            if not chunk:
                raise ConnectionError(f"chromium closed the pipe (exit {self.process.poll()})")
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        decoded: dict[str, Any] = json.loads(message)
        return decoded

    def send(self, method: str, params: dict[str, Any] | None = None, session: str = "") -> Any:
        """``method``'s result; the events that arrive meanwhile go to ``events``."""
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._receive()
            if answer.get("id") != self._next_id:
                self.events.append(answer)
            elif "error" in answer:
                raise RuntimeError(f"{method}: {answer['error']}")
            else:
                return answer.get("result", {})

    def open(self, url: str) -> str:
        """A new tab on ``url``, loaded, at 1280x2000, everything it does recorded: its
        session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session: str = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
            "sessionId"
        ]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable", session=session)
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 2000, "deviceScaleFactor": 1, "mobile": False},
            session,
        )
        self.send("Page.navigate", {"url": url}, session)
        while not any(
            seen.get("method") == "Page.loadEventFired" and seen.get("sessionId") == session
            for seen in self.events
        ):
            self.events.append(self._receive())
        return session

    def evaluate(self, session: str, expression: str) -> Any:
        """``expression``'s value in the page (JSON-able)."""
        answer = self.send(
            "Runtime.evaluate", {"expression": expression, "returnByValue": True}, session
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                self.send("Browser.close")
        except (OSError, RuntimeError, TimeoutError, ConnectionError):
            pass
        finally:
            os.close(self._to_browser)
            os.close(self._from_browser)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def devtools(browser: str, tmp_path: Path) -> Iterator[DevTools]:
    tools = DevTools(browser, tmp_path / "chromium-profile")
    try:
        yield tools
    finally:
        tools.close()


def rgb(colour: str) -> str:
    """``#2e7d32`` as the browser computes it: ``rgb(46, 125, 50)``."""
    red, green, blue = (int(colour[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgb({red}, {green}, {blue})"


@pytest.mark.skipif(importlib.util.find_spec("hypothesis") is None, reason="explore's search")
def test_the_page_in_a_real_browser_renders_every_cell_of_the_json_report_and_nothing_fails(
    pytester: pytest.Pytester, devtools: DevTools
) -> None:
    pytester.makepyfile(proj=APP, test_suite=SUITE, test_explored=EXPLORE)
    pytester.makeini("[pytest]\ncelery_faults_app = proj:app\n")
    html, report = pytester.path / "report.html", pytester.path / "report.json"
    result = pytester.runpytest(
        "-p",
        "no:randomly",
        "--celery-faults=redeliver",
        f"--celery-faults-html={html}",
        f"--celery-faults-report={report}",
    )
    result.assert_outcomes(passed=3)
    document = json.loads(report.read_text())

    session = devtools.open(html.as_uri())
    page = devtools.evaluate(session, READ_PAGE)

    # It renders: the matrix is there, every cell drawn in its class's colour.
    assert page["title"] == "celery-faults report"
    assert {"totals", "gate", "matrix", "explore"} <= set(page["tables"])
    assert page["explore"] == ["task", "proj.append_row"]
    cells = page["cells"]
    assert all(cell["drawn"] and cell["text"] == cell["cls"] for cell in cells)
    assert all(cell["colour"] == rgb(COLOURS[cell["cls"]]) for cell in cells)
    # Exactly the JSON report's cells, test by test.
    assert sorted((c["test"], c["spec"], c["cls"]) for c in cells) == sorted(
        (nodeid, scenario["spec"], scenario["class"])
        for nodeid, test in document["tests"].items()
        for scenario in test.get("scenarios", [])
    )
    assert len(cells) > 4

    # A real click (the mouse, at the cell) opens the cell's detail under its matrix.
    first = next(cell for cell in cells if cell["cls"] != "ok")
    find = (
        "[...document.querySelectorAll('button[data-spec]')].find((b) => b.dataset.spec === "
        f"{json.dumps(first['spec'])} && b.closest('section.test').dataset.test === "
        f"{json.dumps(first['test'])})"
    )
    x, y = devtools.evaluate(
        session,
        f"(() => {{ const b = {find}; b.scrollIntoView({{block: 'center'}});"
        " const r = b.getBoundingClientRect();"
        " return [r.left + r.width / 2, r.top + r.height / 2]; })()",
    )
    for kind in ("mousePressed", "mouseReleased"):
        devtools.send(
            "Input.dispatchMouseEvent",
            {"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1},
            session,
        )
    panel = devtools.evaluate(
        session,
        f"(p => [p.hidden, p.textContent])(document.getElementById({json.dumps(first['panel'])}))",
    )
    assert panel[0] is False
    assert panel[1].startswith(f"{first['spec']}: {first['cls']}\n")
    assert f"replay: celery_faults.run(signature, {first['spec']!r})" in panel[1]

    # Nothing failed in the console; nothing was fetched but the page itself.
    complaints = [
        event["params"]
        for event in devtools.events
        if event.get("method") == "Runtime.exceptionThrown"
        or (
            event.get("method") == "Runtime.consoleAPICalled"
            and event["params"]["type"] in ("error", "warning", "assert")
        )
        or (
            event.get("method") == "Log.entryAdded"
            and event["params"]["entry"]["level"] in ("error", "warning")
        )
    ]
    assert complaints == []
    requested = [
        event["params"]["request"]["url"]
        for event in devtools.events
        if event.get("method") == "Network.requestWillBeSent"
    ]
    assert requested == [html.as_uri()]
    assert page["resources"] == []

    # A screenshot of the whole page, beside the page (the README describes one).
    shot = devtools.send(
        "Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True}, session
    )
    screenshot = Path(os.environ.get("CELERY_FAULTS_SCREENSHOT", pytester.path / "report.png"))
    screenshot.write_bytes(base64.b64decode(shot["data"]))
    assert screenshot.read_bytes().startswith(b"\x89PNG")
