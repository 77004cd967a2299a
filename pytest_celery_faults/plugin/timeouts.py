"""The one place that reads pytest-timeout's settings, in pytest-timeout's own order.

A test's time limit comes from the first of these that is set (pytest-timeout
2.x, ``_get_item_settings`` and ``get_env_settings``):

1. the ``@pytest.mark.timeout(N)`` marker closest to the test;
2. ``--timeout=N`` on the command line;
3. the ``PYTEST_TIMEOUT`` environment variable;
4. the ``timeout`` ini setting.

A source that is set wins even with ``0``, which means "no time limit" (it does
not fall through to the next source). A marker without a time limit (only
``method=``) falls through to the session's setting. When none is set and
pytest-timeout is installed, a test that uses the harness gets
:data:`DEFAULT_TIMEOUT`. The harness also checks the limit while it drains
(:func:`deadline`), so a test stops even when the code under test swallowed
pytest-timeout's own exception.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

#: The time limit of a harness test when pytest-timeout has none configured.
DEFAULT_TIMEOUT = 300.0


def limit_hung_tasks(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every harness test runs under a time limit: pytest-timeout's, else the plugin's.

    When the limit stops a test inside a task, the failure says which task and
    after which side effect it hung (a note on pytest-timeout's exception).
    A limit the user set, ``0`` ("no timeout") included, is theirs to keep.
    """
    if not config.pluginmanager.hasplugin("timeout") or session_timeout(config) is not None:
        return
    for item in items:
        uses_harness = "celery_faults" in getattr(item, "fixturenames", ())
        if uses_harness and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DEFAULT_TIMEOUT))


def session_timeout(config: pytest.Config) -> Any:
    """pytest-timeout's session setting, read in its order: command line, environment, ini.

    The first source that is set wins, even with ``0`` (which means no timeout);
    ``None`` when none is set.
    """
    value: Any = config.getoption("timeout", default=None)
    if value is None:
        value = os.environ.get("PYTEST_TIMEOUT")
    if value is None and config.pluginmanager.hasplugin("timeout"):
        value = config.getini("timeout") or None
    return value


def deadline(item: pytest.Item) -> float | None:
    """When the test's time limit (pytest-timeout's, as it reads it) runs out, on ``monotonic``."""
    import time

    marker = item.get_closest_marker("timeout")
    value: Any = None
    if marker is not None:
        value = marker.kwargs.get("timeout", marker.args[0] if marker.args else None)
    if value is None:
        value = session_timeout(item.config)
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        return None
    return time.monotonic() + seconds if seconds > 0 else None
