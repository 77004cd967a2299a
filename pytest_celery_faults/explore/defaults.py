"""What a session sets for every ``explore()``: the budget, the failure database, the test id."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class ExploreDefaults:
    """What the plugin sets for every test: the suite-wide budget, the database, the test id.

    ``reports`` gathers the summary of each ``explore()`` of the test (for the HTML page).
    """

    budget: int | None = None
    database: str | Path | None = None
    key: str | None = None
    reports: list[dict[str, Any]] = field(default_factory=list)
    #: (this shard, of how many) under ``@pytest.mark.explore_shards(n)``; 0-based.
    shard: tuple[int, int] | None = None
