"""The recording world the plugin's tests share: what their tasks change, in order.

A test asks for the ``world`` fixture (``conftest.py``) and gets a fresh one;
its tasks call ``world.touch(value)``, which ``faults.track((world, "touch"))``
counts as their side effect (``World.touch`` in timelines).
"""

from __future__ import annotations

from typing import Any


class World:
    """What the tasks of a test change; ``touch`` is tracked as their side effect."""

    def __init__(self) -> None:
        self.log: list[Any] = []

    def touch(self, value: Any) -> None:
        self.log.append(value)
